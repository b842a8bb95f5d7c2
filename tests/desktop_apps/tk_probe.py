#!/usr/bin/env python3
"""A small real Tk application for vlad's desktop tests.

It shows a colour swatch, a button, a text entry, a slider and a long list, and writes its own
state (what it received, and where its widgets are on the root window) as JSON to the file given
as the first argument, every 50 ms. The tests read that file: it is the app's view, not ours.

usage: tk_probe.py STATE.json [+X+Y]
"""
import json
import os
import sys
import tkinter as tk

state_path = sys.argv[1]
root = tk.Tk()
root.title("vlad probe")
if len(sys.argv) > 2:
    root.geometry(sys.argv[2])

SWATCH = "#12ab34"
presses = []
buttons_seen = []

swatch = tk.Canvas(root, width=200, height=80, bg=SWATCH, highlightthickness=0, bd=0)
swatch.pack(padx=10, pady=10)

def on_press():
    presses.append(True)

button = tk.Button(root, text="Press me", command=on_press)
button.pack(pady=5)

def on_button_event(event):
    buttons_seen.append({"num": event.num, "x_root": event.x_root, "y_root": event.y_root,
                         "widget": str(event.widget)})

root.bind_all("<ButtonPress>", on_button_event, add="+")

text = tk.StringVar()
entry = tk.Entry(root, textvariable=text, width=30, font=("WenQuanYi Zen Hei", 12))
entry.pack(pady=5)

slider = tk.Scale(root, from_=0, to=100, orient=tk.HORIZONTAL, length=300)
slider.pack(pady=5)

frame = tk.Frame(root)
frame.pack(pady=5)
listbox = tk.Listbox(frame, height=8, width=30)
for i in range(200):
    listbox.insert(tk.END, f"item {i} " + "wide " * 20)
listbox.pack()

# Horizontal wheel (buttons 6 and 7 on X11): Tk 8.6 has no binding for them (and `bind` refuses
# their numbers), so the app scrolls itself when a generic press carries them.
def hscroll(event):
    if event.num in (6, 7):
        listbox.xview_scroll(-5 if event.num == 6 else 5, "units")
listbox.bind("<ButtonPress>", hscroll, add="+")

def geometry(w):
    return {"x": w.winfo_rootx(), "y": w.winfo_rooty(),
            "width": w.winfo_width(), "height": w.winfo_height()}

def dump():
    sx, sy = slider.coords()  # centre of the slider knob, in the scale's own pixels
    st = {
        "presses": len(presses),
        "buttons": buttons_seen[-20:],
        "text": text.get(),
        "slider": slider.get(),
        "slider_knob": [slider.winfo_rootx() + int(sx), slider.winfo_rooty() + int(sy)],
        "list_top": listbox.nearest(0),
        "list_xview": listbox.xview()[0],
        "focus": str(root.focus_get()),
        "swatch": geometry(swatch),
        "button": geometry(button),
        "entry": geometry(entry),
        "slider_box": geometry(slider),
        "list": geometry(listbox),
        "mapped": bool(root.winfo_viewable()),
    }
    tmp = state_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(st, f, ensure_ascii=False)
    os.replace(tmp, state_path)
    root.after(50, dump)

root.after(50, dump)
root.mainloop()
