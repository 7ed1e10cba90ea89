"""The label that marks a token as not trained, shared by masking, the training tables, the loss and the report.

-100 is PyTorch's ``cross_entropy`` ``ignore_index`` default and the value Hugging Face models and collators use.
"""

IGNORE_INDEX = -100
