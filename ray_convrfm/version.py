"""The library's version: a leaf module, so that what records it (kernel stores) imports no
package above it."""

__version__ = "0.1.0"
