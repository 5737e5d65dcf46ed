"""Pure format libraries (OCI, registry, archives): no knowledge of the forge engine."""
