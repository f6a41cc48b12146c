"""sources stage; see DESIGN.md."""
