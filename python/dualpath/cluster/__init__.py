"""Local clusters of real SGLang servers with the DualPath plugin, a router, and trace replay."""
