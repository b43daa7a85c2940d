"""The `vhostfs` command line: flags in, a config out, and a call into the layer that acts.

- `serve`: the virtiofsd-compatible daemon (`vhostfs.cli.serve`);
- `virtiofs`: the nydusd-compatible daemon, as Kata runs it (`vhostfs.cli.nydusd`);
- `build`, `inspect`, `check`, `unpack`: the image commands (`vhostfs.cli.image`);
- `convert`: OCI image to nydus image, registry to registry (`vhostfs.cli.convert`).
"""

import click

from vhostfs.cli.convert import convert_command
from vhostfs.cli.image import build_command, check_command, inspect_command, unpack_command
from vhostfs.cli.nydusd import GLOBAL_OPTIONS, global_options, virtiofs
from vhostfs.cli.serve import serve


@click.group()
@global_options
@click.pass_context
def main(ctx: click.Context, /, **nydusd_globals: object) -> None:
    """virtio-fs vhost-user daemon for microVM guests."""
    # nydusd's global options may come before `virtiofs`; it reads them from here.
    ctx.obj = {
        name: nydusd_globals[name] for name in GLOBAL_OPTIONS if nydusd_globals[name] is not None
    }


main.add_command(serve)
main.add_command(virtiofs)
main.add_command(build_command)
main.add_command(inspect_command)
main.add_command(check_command)
main.add_command(unpack_command)
main.add_command(convert_command)
