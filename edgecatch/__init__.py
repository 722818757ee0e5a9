"""edgecatch: send the images a production vision model struggles with back to its dataset."""

__version__ = "0.1.0"
