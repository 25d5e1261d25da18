"""Starting work in other processes: several training processes on one machine (``torchrun``)."""
