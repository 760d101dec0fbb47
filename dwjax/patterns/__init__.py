"""The DoG family: templates, the code-interval labels, DoG initialisation. Imports model and io."""
