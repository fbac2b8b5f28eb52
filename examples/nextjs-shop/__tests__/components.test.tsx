import { act, fireEvent, render, screen } from "@testing-library/react";
import { Bell } from "@/components/Bell";
import { OrderRow, FRESH_MS } from "@/components/OrderRow";
import { Toasts } from "@/components/Toasts";

describe("Bell", () => {
  it("shows the unread count, caps it, and hides it at zero", () => {
    const { rerender } = render(<Bell unread={3} onClick={() => {}} />);
    expect(screen.getByTestId("badge").textContent).toBe("3");
    expect(screen.getByTestId("bell").getAttribute("aria-label")).toBe("Notifications, 3 unread");
    rerender(<Bell unread={250} onClick={() => {}} />);
    expect(screen.getByTestId("badge").textContent).toBe("99+");
    rerender(<Bell unread={0} onClick={() => {}} />);
    expect(screen.queryByTestId("badge")).toBeNull();
  });

  it("opens the centre when clicked", () => {
    const onClick = jest.fn();
    render(<Bell unread={1} onClick={onClick} />);
    fireEvent.click(screen.getByTestId("bell"));
    expect(onClick).toHaveBeenCalledTimes(1);
  });
});

describe("Toasts", () => {
  it("shows each toast with its title and body, and dismisses one", () => {
    const onDismiss = jest.fn();
    render(
      <Toasts
        toasts={[
          { key: "1", title: "Payment received", body: "We received 12.50 EUR." },
          { key: "2", title: "Order A-2 shipped", body: "" },
        ]}
        onDismiss={onDismiss}
      />,
    );
    const toasts = screen.getAllByTestId("toast");
    expect(toasts).toHaveLength(2);
    expect(toasts[0]!.textContent).toContain("Payment received");
    expect(toasts[0]!.textContent).toContain("We received 12.50 EUR.");
    expect(toasts[1]!.querySelector("p")).toBeNull();
    fireEvent.click(screen.getAllByLabelText("Dismiss")[1]!);
    expect(onDismiss).toHaveBeenCalledWith("2");
  });
});

describe("OrderRow", () => {
  function row(status: string, changedAt: number, now: number) {
    return (
      <table>
        <tbody>
          <OrderRow order={{ id: "A-1", status, changedAt }} now={now} />
        </tbody>
      </table>
    );
  }

  it("shows the status, highlighted right after a change and not later", () => {
    const { rerender } = render(row("paid", 1_000, 1_500));
    const r = screen.getByTestId("order-A-1");
    expect(r.className).toContain("fresh");
    expect(screen.getByTestId("status").textContent).toBe("paid");
    act(() => rerender(row("out_for_delivery", 1_000, 1_000 + FRESH_MS + 1)));
    expect(screen.getByTestId("status").textContent).toBe("out for delivery");
    expect(screen.getByTestId("status").className).toContain("status-out_for_delivery");
    expect(screen.getByTestId("order-A-1").className).not.toContain("fresh");
  });
});
