"""deploy: Ray cluster-launcher configs (`aws.yaml`, `onprem.yaml`, `loopback.yaml`) and `pdserve deploy check`."""
