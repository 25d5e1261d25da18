"""Where raw images come from: a local folder or an image site."""
