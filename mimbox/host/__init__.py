"""This host's kernel as the converter uses it: probes and mounts, netfilter rules, the BPF SYN recorder and SYN-ACK reader, privileges, resources."""
