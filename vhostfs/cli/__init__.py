"""The `vhostfs` command line: flags in, a config out, and a call into the layer that acts.

- `serve`: the virtiofsd-compatible daemon (`vhostfs.cli.serve`);
- `build`, `inspect`, `check`, `unpack`: the image commands (`vhostfs.cli.image`).
"""

import click

from vhostfs.cli.image import build_command, check_command, inspect_command, unpack_command
from vhostfs.cli.serve import serve


@click.group()
def main() -> None:
    """virtio-fs vhost-user daemon for microVM guests."""


main.add_command(serve)
main.add_command(build_command)
main.add_command(inspect_command)
main.add_command(check_command)
main.add_command(unpack_command)
