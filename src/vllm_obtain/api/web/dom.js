// The few DOM helpers every view uses.

export const $ = (id) => document.getElementById(id);

/** A picker's options: one per value, shown as itself (as text: model ids are not HTML). */
export function fillPicker(picker, values) {
  picker.replaceChildren(
    ...values.map((value) => {
      const option = document.createElement("option");
      option.value = option.textContent = value;
      return option;
    }),
  );
}
