"""Ray jobs: the only place where Ray meets torch (see DESIGN.md)."""
