"""What shows a run: figures, tables, the report's sections and page. Imports patterns, search,
model and io; never switches the matplotlib backend."""
