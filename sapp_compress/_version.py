"""The package's version, in a module of its own: the report and the CLI read it without importing the
package's front door (which would import every stage)."""
__version__ = "0.1.0"
