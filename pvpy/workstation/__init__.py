"""What only a developer's machine runs: specs, images, QEMU, pushing and publishing."""
