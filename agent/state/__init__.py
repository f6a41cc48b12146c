"""state stage; see DESIGN.md."""
