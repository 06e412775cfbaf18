"""Worker scripts that the actor/checkpoint/conversion tests launch with torchrun, plus launch helpers."""
