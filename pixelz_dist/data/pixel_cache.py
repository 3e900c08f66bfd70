# TEMPORARY STUB (not committed): replaced by the cache branch.
class PixelCache:
    def __init__(self, root):
        self.root = root
