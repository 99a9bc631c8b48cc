"""The wire formats: addresses of both families, the DST_OPT TCP option, RFC 8803's messages, MPTCP's socket constants."""
