"""The vocabulary every layer shares: errors, extents, the error policy, clocks.

Imports nothing from the rest of the plugin.
"""
