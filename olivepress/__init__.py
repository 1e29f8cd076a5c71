"""olivepress: the host side (launcher, image builds, the Azure ML push)."""
