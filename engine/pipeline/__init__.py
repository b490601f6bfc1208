"""The host face pipeline and I/O: decode, detect, track, plan chips, batch, paste back, encode."""
