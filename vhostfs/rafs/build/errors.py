"""What the builder raises when its input cannot become an image."""


class BuildError(Exception):
    """The sources or options cannot be built into an image; the message says which and why."""
