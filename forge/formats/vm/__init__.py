"""Running images under QEMU (accelerator choice, firmware, boot specs) and probing them
(serial-console patterns, TCP, Redis PING).

May import: nothing of forge but `forge.formats.errors`.
"""
