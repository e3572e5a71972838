"""What local VMs boot (definition), mtevm's Linux guest image (linux/) and the host's end of its agent (agent)."""
