"""From raw images to a training dataset: cleaning, 3-stage crops, tags and captions."""
