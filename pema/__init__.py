"""PEMA: Plug-in External Memory Adaptation."""
