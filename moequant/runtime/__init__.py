"""What every stage runs on: the compute device (devices.py), the allocator's settings (memory.py), the
torchrun ranks and their collectives (ranks.py), and the timing of a command's passes (timing.py)."""
