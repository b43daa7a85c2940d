"""The image commands: `vhostfs build`, `inspect`, `check` and `unpack`.

Bad images, sources or options end in a one-line message and exit status 1, never a traceback:
every error the library raises for its input is turned into a click error here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import click

from vhostfs.rafs.base import InodeAttr, RafsImage
from vhostfs.rafs.build import BuildError, BuildOptions, build_image
from vhostfs.rafs.build.builder import DEFAULT_CHUNK_SIZE
from vhostfs.rafs.build.compression import BUILD_COMPRESSORS
from vhostfs.rafs.build.progress import Progress
from vhostfs.rafs.build.unpack import UnpackError, unpack_image
from vhostfs.rafs.build.verify import CheckFailed, check_image
from vhostfs.rafs.errors import RafsError
from vhostfs.rafs.image import open_image
from vhostfs.storage.blob import Compressor, Digester
from vhostfs.storage.config import ConfigError, RafsConfig, parse_config
from vhostfs.storage.errors import StorageError
from vhostfs.storage.sync import SyncStorage

_UNITS = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20}
_Result = TypeVar("_Result")


def _fail(message: object) -> NoReturn:
    raise click.ClickException(" ".join(str(message).split()))


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Errors about the input become one-line messages."""
    try:
        yield
    except (RafsError, StorageError, ConfigError, BuildError, CheckFailed, UnpackError) as e:
        _fail(e)
    except OSError as e:
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}")


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    text = value.strip().lower().removesuffix("b")
    digits = text.rstrip("kmi")
    unit = _UNITS.get(text[len(digits) :])
    try:
        number = int(digits, 0)
    except ValueError:
        number = -1
    if unit is None or number <= 0:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 1M, 64K, 0x100000)")
    return number * unit


_blob_option = click.option(
    "--blob",
    "blob_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A blob file, in device-table order (repeatable); for images whose device slots "
    "name no blob id, such as mkfs.erofs --blobdev output.",
)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="A nydusd config (v1 JSON, or v2 JSON or TOML) saying where the blobs are, e.g. a "
    "registry; replaces --blob-dir and --blob. Its cache is not used.",
)


def _open_storage(
    image: RafsImage, blob_dir: str | None, blob_files: tuple[str, ...], config_path: str | None
) -> SyncStorage:
    """The image's storage as the server would open it from the same flags, minus the cache."""
    if config_path is not None:
        if blob_dir or blob_files:
            _fail("--config replaces --blob-dir and --blob")
        with open(config_path, "rb") as f:
            config = parse_config(f.read())
        # Offline tools verify what they read whatever the config says: that is their job.
        config = dataclasses.replace(config, digest_validate=True)
    else:
        config = RafsConfig.from_flags(blob_dir=blob_dir, blob_files=blob_files)
    return SyncStorage(config, image.blobs, bootstrap=image.path)


def _with_image(path: str, use: Callable[[RafsImage], _Result]) -> _Result:
    with _clean_errors(), open_image(path) as image:
        return use(image)


# --- build ---------------------------------------------------------------------------------


@click.command("build")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the bootstrap and the blob (created if missing).",
)
@click.option(
    "--chunk-size",
    default=str(DEFAULT_CHUNK_SIZE),
    callback=_parse_size,
    show_default="1M",
    help="Chunk size: a power of two from 4K to 16M.",
)
@click.option(
    "--compressor",
    type=click.Choice([c.value for c in BUILD_COMPRESSORS]),
    default=Compressor.ZSTD.value,
    show_default=True,
)
@click.option(
    "--digester",
    type=click.Choice([d.value for d in Digester]),
    default=Digester.BLAKE3.value,
    show_default=True,
)
def build_command(
    sources: tuple[str, ...], output: str, chunk_size: int, compressor: str, digester: str
) -> None:
    """Build a RAFS v6 image from SOURCES: a directory, a tar or tar.gz layer, or several
    layers applied in order (OCI whiteouts and opaque directories).

    Writes OUTPUT/bootstrap and one data blob named by its id (its sha256). Uncompressed builds
    can also be mounted by the kernel: mount -t erofs -o device=BLOB BOOTSTRAP DIR.
    """
    options = BuildOptions(
        chunk_size=chunk_size, compressor=Compressor(compressor), digester=Digester(digester)
    )
    with _clean_errors():
        result = build_image(sources, output, options)
    click.echo(f"bootstrap: {result.bootstrap} ({result.bootstrap_size} bytes)")
    if result.blob is None:
        click.echo("blob: none (no file data)")
    else:
        blob = result.blob
        click.echo(f"blob: {blob.path} ({blob.compressed_size} bytes, {blob.chunk_count} chunks)")
    click.echo(
        f"inodes: {result.inode_count}, file data: {result.file_bytes} bytes, "
        f"deduplicated: {result.deduplicated_bytes} bytes"
    )


# --- inspect -------------------------------------------------------------------------------


@click.command("inspect")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--tree", is_flag=True, help="List every path with its type, mode and size.")
@_blob_option
def inspect_command(image: str, tree: bool, blob_files: tuple[str, ...]) -> None:
    """Summarise an image: superblock, blobs and entry counts."""
    _with_image(image, lambda opened: _inspect(opened, tree, blob_files))


def _inspect(image: RafsImage, tree: bool, blob_files: tuple[str, ...]) -> None:
    statfs = image.statfs()
    click.echo(f"image: {image.path}")
    click.echo(f"format: {image.format}")
    chunk_size = getattr(image, "chunk_size", None)
    if chunk_size is not None:
        click.echo(f"chunk size: {chunk_size}")
    ext = getattr(image, "ext", None)
    if ext is not None:
        click.echo(f"flags: {ext.flags:#x}")
    click.echo(f"root inode: {image.root_ino}")
    click.echo(f"inodes: {statfs.files}")
    click.echo(f"blobs: {len(image.blobs)}")
    for blob in image.blobs:
        digester = blob.digester.value if blob.digester is not None else "none"
        file_note = f" file {blob_files[blob.index]}" if blob.index < len(blob_files) else ""
        click.echo(
            f"  [{blob.index}] {blob.blob_id or '(no id)'}: {blob.compressor.value}/{digester}, "
            f"{blob.chunk_count} chunks, compressed {blob.compressed_size}, uncompressed "
            f"{blob.uncompressed_size}, features {blob.features:#x}{file_note}"
        )
    counts: dict[str, int] = {}
    file_bytes = 0
    first_path: dict[int, bytes] = {}  # a later path to the same inode is a hard link
    for path, ino, attr in image.walk():
        link_to = first_path.get(ino)
        kind = "hard links" if link_to else _KIND_NAMES.get(stat.S_IFMT(attr.mode), "other")
        counts[kind] = counts.get(kind, 0) + 1
        if link_to is None:
            first_path[ino] = path
            if stat.S_ISREG(attr.mode):
                file_bytes += attr.size
        if tree:
            click.echo(_tree_line(image, path, ino, attr, link_to))
    summary = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    click.echo(f"entries: {summary}; file data {file_bytes} bytes")


_KIND_NAMES = {
    stat.S_IFDIR: "directories",
    stat.S_IFREG: "files",
    stat.S_IFLNK: "symlinks",
    stat.S_IFCHR: "char devices",
    stat.S_IFBLK: "block devices",
    stat.S_IFIFO: "fifos",
    stat.S_IFSOCK: "sockets",
}


def _tree_line(
    image: RafsImage, path: bytes, ino: int, attr: InodeAttr, link_to: bytes | None
) -> str:
    name = path.decode(errors="backslashreplace")
    line = f"{stat.filemode(attr.mode)} {attr.uid}/{attr.gid} {attr.size:>12} {name}"
    if stat.S_ISLNK(attr.mode):
        line += " -> " + image.readlink(ino).decode(errors="backslashreplace")
    if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode):
        line += f" [{os.major(attr.rdev)},{os.minor(attr.rdev)}]"
    if link_to is not None:
        line += " (hard link to " + link_to.decode(errors="backslashreplace") + ")"
    return line


# --- check ---------------------------------------------------------------------------------


@click.command("check")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--blob-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Directory holding the image's blobs, named by blob id.",
)
@_blob_option
@_config_option
def check_command(
    image: str, blob_dir: str | None, blob_files: tuple[str, ...], config_path: str | None
) -> None:
    """Read every file of an image end to end and verify every chunk digest; exit status 1
    at the first problem, naming the file and chunk."""
    _with_image(image, lambda opened: _check(opened, blob_dir, blob_files, config_path))


def _file_bytes(image: RafsImage) -> int:
    """For the progress bar: only worth a walk of its own when there is a bar to draw."""
    if not sys.stderr.isatty():
        return 0
    return sum(attr.size for _, _, attr in image.walk() if stat.S_ISREG(attr.mode))


def _check(
    image: RafsImage, blob_dir: str | None, blob_files: tuple[str, ...], config_path: str | None
) -> None:
    total = _file_bytes(image)
    with (
        _open_storage(image, blob_dir, blob_files, config_path) as store,
        Progress(total, "check") as progress,
    ):
        report = check_image(image, store, on_file=progress.advance)
    click.echo(
        f"ok: {report.inodes} entries, {report.files} files, {report.file_bytes} bytes read, "
        f"{report.chunks_verified} chunk digests verified"
    )
    for index in sorted(report.unverified_blobs):
        click.echo(f"note: blob {index} records no chunk digests: its data was only read")


# --- unpack --------------------------------------------------------------------------------


@click.command("unpack")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--blob-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Directory holding the image's blobs, named by blob id.",
)
@_blob_option
@_config_option
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Directory to write the tree to (missing or empty).",
)
def unpack_command(
    image: str,
    blob_dir: str | None,
    blob_files: tuple[str, ...],
    config_path: str | None,
    output: str,
) -> None:
    """Write an image's tree to OUTPUT with modes, owners (as root), hard and symbolic links,
    xattrs, mtimes, and device nodes (as root)."""
    _with_image(image, lambda opened: _unpack(opened, blob_dir, blob_files, config_path, output))


def _unpack(
    image: RafsImage,
    blob_dir: str | None,
    blob_files: tuple[str, ...],
    config_path: str | None,
    out: str,
) -> None:
    total = _file_bytes(image)
    with (
        _open_storage(image, blob_dir, blob_files, config_path) as store,
        Progress(total, "unpack") as progress,
    ):
        report = unpack_image(image, store, out, on_file=progress.advance)
    for skipped in report.skipped:
        click.echo(f"skipped: {skipped}", err=True)
    click.echo(f"unpacked {report.inodes} entries, {report.file_bytes} bytes to {out}")
