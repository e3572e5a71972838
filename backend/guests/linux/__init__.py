"""mtevm's Linux MTE guest: its image pipeline (image, apt, cpio) and its programs (guest/)."""
