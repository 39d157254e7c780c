"""The thin napari shell: reader, widgets, sample data. The only package that imports napari or Qt."""
