"""What the server and the client both need, and nothing else: the explanation methods' names,
wire values and traits (`methods`), KServe's tensor datatypes (`datatypes`), and heatmaps drawn
as pictures (`overlay`). The server never imports the client, nor the client the server; both
import this.
"""
