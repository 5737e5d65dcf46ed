"""LinuxKit assemblies: the YAML schema with file:line:col errors, their image
references, and the OCI runtime config LinuxKit derives for each entry.

May import: `forge.formats.image`.
"""
