"""What both adapters need from a server: request bodies, engine flags, running and draining."""
