"""Background work inside the server: the periodic runner and its passes."""
