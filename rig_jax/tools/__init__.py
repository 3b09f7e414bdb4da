"""The command-line tools (console scripts `rig-*`): thin entry points over the library."""
