"""The sync wire protocol, sans-I/O: messages, codec and state machines."""
