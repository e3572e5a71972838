"""What runs inside VMs besides mtevm's bare-metal guest: guest images built on this machine
(linux/), what a local VM boots (definition) and the host's end of the Linux guest agent (agent)."""
