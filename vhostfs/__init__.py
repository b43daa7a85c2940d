"""vhostfs: a virtio-fs vhost-user daemon serving Nydus RAFS images and host directories."""

__version__ = "0.1.0"
