"""The converter's processes: the supervisor and its workers, the C core's binding, the Python side of a worker's loop."""
