"""The convolutional neural feature ansatz (CNFA) measured on any torch CNN."""
