"""The vhost-user side: message codec, backend state machine, guest memory, virtqueues."""
