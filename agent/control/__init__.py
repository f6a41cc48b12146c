"""control stage; see DESIGN.md."""
