"""The client side: run a program so its connections reach their servers through a converter."""
