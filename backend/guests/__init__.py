"""What runs inside VMs besides mtevm's bare-metal guest: guest images built on this machine."""
