"""Recipe forms that expand into plan items: slices, PlaM, PivotMerge."""
