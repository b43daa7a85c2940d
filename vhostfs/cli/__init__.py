"""The `vhostfs` command line: flags in, a config out, and a call into the layer that acts.

- `serve`: the virtiofsd-compatible daemon (`vhostfs.cli.serve`);
- `virtiofs`: the nydusd-compatible daemon, as Kata runs it (`vhostfs.cli.nydusd`);
- `build`, `inspect`, `check`, `unpack`: the image commands (`vhostfs.cli.image`);
- `convert`: OCI image to nydus image, registry to registry (`vhostfs.cli.convert`).

Each command's module is imported only when that command runs: the daemons then carry
neither the image builder nor the registry client (start-up time and memory Kata pays for
every sandbox).
"""

import importlib

import click

from vhostfs.cli.nydusd import GLOBAL_OPTIONS, global_options

# command name -> (module, attribute)
COMMANDS = {
    "serve": ("vhostfs.cli.serve", "serve"),
    "virtiofs": ("vhostfs.cli.nydusd", "virtiofs"),
    "build": ("vhostfs.cli.image", "build_command"),
    "inspect": ("vhostfs.cli.image", "inspect_command"),
    "check": ("vhostfs.cli.image", "check_command"),
    "unpack": ("vhostfs.cli.image", "unpack_command"),
    "convert": ("vhostfs.cli.convert", "convert_command"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@global_options
@click.pass_context
def main(ctx: click.Context, /, **nydusd_globals: object) -> None:
    """virtio-fs vhost-user daemon for microVM guests."""
    # nydusd's global options may come before `virtiofs`; it reads them from here.
    ctx.obj = {
        name: nydusd_globals[name] for name in GLOBAL_OPTIONS if nydusd_globals[name] is not None
    }
