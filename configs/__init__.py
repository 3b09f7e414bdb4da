"""Python configs: each `configs/<name>.py` defines `get_config(variant) -> ConfigDict`."""
