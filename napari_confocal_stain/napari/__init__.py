"""The thin napari shell (reader, widgets, sample data): the only package importing napari/Qt."""
