"""vhostfs: a virtio-fs vhost-user daemon serving Nydus RAFS images and host directories."""
