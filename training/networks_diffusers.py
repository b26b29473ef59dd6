"""diffusers networks as EDM denoisers (being written)."""
